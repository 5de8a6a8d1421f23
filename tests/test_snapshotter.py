"""The node daemon as containerd's proxy snapshotter.

Unit level (no root): the metadata store's semantics and error kinds, the filter language, the
overlay mount plans, the remote-layer flow with fake hooks, and the gRPC face in-process.
With root + containerd + runc: plain ``ctr images pull``/``ctr run`` through the daemon
(whiteouts, opaque dirs, hardlinks, writes land in the container's upper dir only), remote layers
via ``ctr-remote image rpull`` (no layer blob fetched), the CRI PullImage path (its labels reach the
hook) and a daemon killed with SIGKILL that comes back knowing every snapshot.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import yaml
from click.testing import CliRunner

from fixtures.build_images import real_bytes
from imgaccel.cli.node_commands import node_config
from imgaccel.snapshotter import filters
from imgaccel.snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from imgaccel.snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from imgaccel.snapshotter.api.runtime.v1 import api_pb2 as cri
from imgaccel.snapshotter.api.runtime.v1 import api_pb2_grpc as cri_grpc
from imgaccel.snapshotter.config import (
    ConfigError,
    CriProxyConfig,
    NodeConfig,
    PrewarmAgentConfig,
    containerd_snippet,
    load_node_config,
)
from imgaccel.snapshotter.daemon import Daemon
from imgaccel.snapshotter.erofs_layers import unmount_all
from imgaccel.snapshotter.metadata import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    Kind,
    MetadataStore,
    NotFound,
)
from imgaccel.snapshotter.snapshots import LABEL_REMOTE, LABEL_TARGET, Snapshotter
from tests.containerd import MISSING, running_containerd
from tests.helpers import get_json
from tests.registry import Registry

ROOT = os.geteuid() == 0
NEEDS_CONTAINERD = pytest.mark.skipif(
    not ROOT or bool(MISSING),
    reason="containerd needs root" if not ROOT else f"missing {', '.join(MISSING)} (scripts/install installs them)",
)
CTR_REMOTE = shutil.which("ctr-remote")
REPO = Path(__file__).resolve().parent.parent


# -- metadata store ------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MetadataStore]:
    s = MetadataStore(tmp_path / "meta.db")
    yield s
    s.close()


def test_store_lifecycle_and_errors(store: MetadataStore) -> None:
    a = store.create("ns", Kind.ACTIVE, "a", labels={"x": "1"})
    assert a.info.kind == Kind.ACTIVE and a.info.parent == "" and a.info.labels == {"x": "1"}
    with pytest.raises(AlreadyExists):
        store.create("ns", Kind.ACTIVE, "a")
    store.create("other", Kind.ACTIVE, "a")  # namespaces are separate
    with pytest.raises(NotFound):
        store.create("ns", Kind.ACTIVE, "b", parent="missing")
    with pytest.raises(InvalidArgument):  # a parent must be committed
        store.create("ns", Kind.ACTIVE, "b", parent="a")
    with pytest.raises(InvalidArgument):
        store.create("ns", Kind.COMMITTED, "c")
    with pytest.raises(InvalidArgument):
        store.create("ns", Kind.ACTIVE, "")
    with pytest.raises(InvalidArgument):
        store.create("ns", Kind.ACTIVE, "big", labels={"k": "v" * 5000})

    l1 = store.commit("ns", "a", "layer1", labels={"y": "2"})
    assert l1.id == a.id and l1.info.kind == Kind.COMMITTED
    assert l1.info.labels == {"y": "2"}  # commit labels replace the active ones, as containerd does
    with pytest.raises(NotFound):
        store.get("ns", "a")
    store.create("ns", Kind.ACTIVE, "a2", parent="layer1")
    with pytest.raises(AlreadyExists):
        store.commit("ns", "a2", "layer1")
    with pytest.raises(NotFound):
        store.commit("ns", "nope", "x")
    with pytest.raises(FailedPrecondition):
        store.commit("ns", "layer1", "x")  # not active
    with pytest.raises(InvalidArgument):
        store.commit("ns", "a2", "x", parent="other-parent")
    l2 = store.commit("ns", "a2", "layer2")
    assert l2.info.parent == "layer1"
    v = store.create("ns", Kind.VIEW, "v", parent="layer2")
    assert [p.info.name for p in store.parents(v)] == ["layer2", "layer1"]  # nearest first

    with pytest.raises(FailedPrecondition):
        store.remove("ns", "layer1")  # has a child
    with pytest.raises(NotFound):
        store.remove("ns", "ghost")
    store.remove("ns", "v")
    store.remove("ns", "layer2")
    removed = store.remove("ns", "layer1")
    assert removed.id == a.id
    again = store.create("ns", Kind.ACTIVE, "a")
    assert int(again.id) > int(l2.id)  # ids are never reused


def test_store_update_labels(store: MetadataStore) -> None:
    store.create("ns", Kind.ACTIVE, "k", labels={"a": "1", "b": "2"})
    before = store.get("ns", "k").info.updated
    info = store.update("ns", "k", {"b": "3", "c": "4"}, ["labels.b"]).info
    assert info.labels == {"a": "1", "b": "3"} and info.updated >= before
    assert store.update("ns", "k", {}, ["labels.a"]).info.labels == {"b": "3"}  # absent value: removed
    assert store.update("ns", "k", {"z": "9"}, ["labels"]).info.labels == {"z": "9"}
    assert store.update("ns", "k", {"q": "1"}).info.labels == {"q": "1"}  # no paths: replace all
    with pytest.raises(InvalidArgument):
        store.update("ns", "k", {}, ["parent"])
    with pytest.raises(NotFound):
        store.update("ns", "missing", {})


def test_store_walk_filters(store: MetadataStore) -> None:
    store.create("ns", Kind.ACTIVE, "base", labels={"containerd.io/snapshot.ref": "sha256:aa", "team": "x"})
    store.commit("ns", "base", "sha256:aa", labels={"containerd.io/snapshot.ref": "sha256:aa", "team": "x"})
    store.create("ns", Kind.ACTIVE, "work", parent="sha256:aa", labels={"team": "y"})
    store.create("ns", Kind.VIEW, "peek", parent="sha256:aa")

    def names(*fs: str) -> list[str]:
        return [s.info.name for s in store.walk("ns", fs)]

    assert names() == ["sha256:aa", "work", "peek"]
    assert names("kind==committed") == ["sha256:aa"]
    assert names("kind!=committed") == ["work", "peek"]
    assert names('parent=="sha256:aa",kind==active') == ["work"]
    assert names("name==peek", "labels.team==y") == ["work", "peek"]  # filters are OR'ed
    assert names('labels."containerd.io/snapshot.ref"==sha256:aa,parent==""') == ["sha256:aa"]
    assert names("labels.team") == ["sha256:aa", "work"]  # presence
    assert names("name~=^p") == ["peek"]
    assert store.walk("other") == []
    for bad in ("name=", "name==a,", '"unterminated', "name~=(", "kind=>x"):
        with pytest.raises(InvalidArgument):
            store.walk("ns", [bad])


def test_store_survives_reopen_and_rolls_back(tmp_path: Path) -> None:
    s = MetadataStore(tmp_path / "m.db")
    s.create("ns", Kind.ACTIVE, "a")
    s.commit("ns", "a", "c1")
    with pytest.raises(RuntimeError), s.transaction():
        s.create("ns", Kind.ACTIVE, "doomed", parent="c1")
        raise RuntimeError("disk full")
    s.close()
    s = MetadataStore(tmp_path / "m.db")
    assert [x.info.name for x in s.all()] == ["c1"]
    s.close()


def test_filter_syntax() -> None:
    f = filters.parse(r'labels."a.b"==/x\/y/,name~=|^n.*|')
    assert [s.fieldpath for s in f.selectors] == [("labels", "a.b"), ("name",)]
    assert f.selectors[0].value == "x/y"
    fields = filters.snapshot_fields("nm", "", "view", {"a.b": "x/y"})
    assert f.matches(fields)
    assert filters.parse("labels.a.b==1").selectors[0].fieldpath == ("labels", "a", "b")
    assert filters.snapshot_fields("n", "", "view", {"a.b": "1"})(("labels", "a", "b")) == "1"
    assert filters.parse_all([])(fields)
    with pytest.raises(filters.FilterError, match="offset"):
        filters.parse("name==a b")


# -- snapshots on disk, remote layers ---------------------------------------------------------------


class FakeRemote:
    def __init__(self, answer: str | Exception | None) -> None:
        self.answer = answer
        self.prepared: list[tuple[str, str, str | None, dict[str, str]]] = []
        self.removed: list[tuple[str, str, str]] = []

    async def prepare(self, namespace: str, key: str, parent: str | None, labels: dict[str, str]) -> str | None:
        self.prepared.append((namespace, key, parent, labels))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    async def remove(self, namespace: str, name: str, directory: str) -> None:
        self.removed.append((namespace, name, directory))


async def test_mount_plans(tmp_path: Path) -> None:
    sn = Snapshotter(tmp_path / "root")
    d = sn.snapshots_dir
    try:
        (m,) = await sn.prepare("", "ns/1/a", "", {})
        assert m.type == "bind" and m.options == ("rw", "rbind") and m.source == f"{d}/1/fs"
        assert (d / "1" / "work").is_dir()
        await sn.commit("", "L1", "ns/1/a", {})
        (m,) = await sn.prepare("", "ns/2/b", "L1", {})
        opts = [o for o in m.options if o != "index=off"]
        assert m.type == "overlay" and opts == [f"workdir={d}/2/work", f"upperdir={d}/2/fs", f"lowerdir={d}/1/fs"]
        (d / "2" / "fs" / "file").write_bytes(b"x" * 10000)
        usage = await sn.usage("", "ns/2/b")
        assert usage.size >= 10000 and usage.inodes == 2
        await sn.commit("", "L2", "ns/2/b", {})
        assert (await sn.usage("", "L2")).size >= 10000  # recorded at commit
        (m,) = await sn.view("", "v1", "L1", {})
        assert (m.type, m.source, m.options) == ("bind", f"{d}/1/fs", ("ro", "rbind"))
        (m,) = await sn.view("", "v2", "L2", {})
        assert m.type == "overlay" and f"lowerdir={d}/2/fs:{d}/1/fs" in m.options
        assert not any(o.startswith(("upperdir", "workdir")) for o in m.options)
        assert await sn.mounts("", "v2") == [m]
        assert not (d / "4" / "work").exists()  # views get no work dir
        (m,) = await sn.view("", "v0", "", {})
        assert m.options == ("ro", "rbind")
        with pytest.raises(FailedPrecondition):
            await sn.mounts("", "L1")  # committed snapshots have no mounts
        with pytest.raises(NotFound):
            await sn.mounts("", "nope")
        with pytest.raises(FailedPrecondition):
            await sn.remove("", "L1")
        await sn.remove("", "v1")
        assert not (d / "3").exists()
        (d / "new-crashed").mkdir()
        (d / "999").mkdir()
        await sn.cleanup()
        assert sorted(p.name for p in d.iterdir()) == ["1", "2", "4", "5"]
    finally:
        await sn.close()


async def test_remote_layer_flow(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    (layer / "etc").mkdir(parents=True)
    remote = FakeRemote(str(layer))
    sn = Snapshotter(tmp_path / "root", remote)
    labels = {LABEL_TARGET: "sha256:c1", "containerd.io/snapshot/cri.layer-digest": "sha256:l1"}
    try:
        with pytest.raises(AlreadyExists, match="sha256:c1"):
            await sn.prepare("", "k8s.io/7/extract-1", "", labels)
        assert remote.prepared == [("k8s.io", "k8s.io/7/extract-1", None, labels)]
        info = await sn.stat("", "sha256:c1")
        assert info.kind == Kind.COMMITTED and info.labels[LABEL_REMOTE] == "imgaccel"
        assert info.labels[LABEL_TARGET] == "sha256:c1"  # containerd's Walk after ALREADY_EXISTS looks for it
        with pytest.raises(NotFound):
            await sn.stat("", "k8s.io/7/extract-1")  # the active key is never created
        found = await sn.walk("", ['labels."containerd.io/snapshot.ref"==sha256:c1,parent==""'])
        assert [i.name for i in found] == ["sha256:c1"]
        with pytest.raises(AlreadyExists):  # asked again: answered from the store, no second mount
            await sn.prepare("", "k8s.io/8/extract-2", "", labels)
        assert len(remote.prepared) == 1
        (m,) = await sn.prepare("", "ctr", "sha256:c1", {})
        assert f"lowerdir={layer}" in m.options  # the remote directory is the layer's tree
        await sn.remove("", "ctr")
        await sn.remove("", "sha256:c1")
        assert remote.removed == [("", "sha256:c1", str(layer))]

        for answer in (None, RuntimeError("registry down"), str(tmp_path / "a:b"), "relative/dir"):
            remote.answer = answer
            target = f"sha256:{len(remote.prepared)}"
            (m,) = await sn.prepare("", f"k/{target}", "", {**labels, LABEL_TARGET: target})
            assert m.type == "bind"  # declined, failed or unusable: a normal active snapshot
            assert (await sn.stat("", f"k/{target}")).kind == Kind.ACTIVE
        assert len(remote.removed) == 3  # the two unusable directories were handed back
    finally:
        await sn.close()


# -- gRPC face, in-process -----------------------------------------------------------------------------


async def test_grpc_service_codes(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    daemon = Daemon(NodeConfig(socket=sock, root=tmp_path / "root"))
    await daemon.start()
    try:
        async with grpc.aio.insecure_channel(f"unix://{sock}") as ch:
            stub = pb_grpc.SnapshotsStub(ch)
            md = (("containerd-namespace", "n1"),)
            r = await stub.Prepare(pb.PrepareSnapshotRequest(key="a", labels={"l": "1"}), metadata=md)
            assert r.mounts[0].type == "bind" and list(r.mounts[0].options) == ["rw", "rbind"]
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Prepare(pb.PrepareSnapshotRequest(key="a"), metadata=md)
            assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
            # One namespace whatever the header says: containerd sends it on some calls only
            # (its keys carry the namespace already), so a snapshot made with it is found without.
            assert (await stub.Stat(pb.StatSnapshotRequest(key="a"))).info.name == "a"
            await stub.Commit(pb.CommitSnapshotRequest(key="a", name="c", labels={"m": "2"}), metadata=md)
            st = await stub.Stat(pb.StatSnapshotRequest(key="c"), metadata=md)
            assert st.info.kind == pb.COMMITTED and dict(st.info.labels) == {"m": "2"}
            assert st.info.created_at.seconds > 1_600_000_000
            await stub.Prepare(pb.PrepareSnapshotRequest(key="child", parent="c"), metadata=md)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Remove(pb.RemoveSnapshotRequest(key="c"), metadata=md)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            upd = pb.UpdateSnapshotRequest(info=pb.Info(name="c", labels={"n": "3"}))
            upd.update_mask.paths.append("labels.n")
            assert dict((await stub.Update(upd, metadata=md)).info.labels) == {"m": "2", "n": "3"}
            upd.update_mask.paths[:] = ["kind"]
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Update(upd, metadata=md)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            listed = [i.name async for resp in stub.List(pb.ListSnapshotsRequest(), metadata=md) for i in resp.info]
            assert sorted(listed) == ["c", "child"]
            only = stub.List(pb.ListSnapshotsRequest(filters=["kind==active"]), metadata=md)
            assert [i.name async for resp in only for i in resp.info] == ["child"]
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in stub.List(pb.ListSnapshotsRequest(filters=["kind=="]), metadata=md):
                    pass
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            mounts = await stub.Mounts(pb.MountsRequest(key="child"), metadata=md)
            assert mounts.mounts[0].type == "overlay"
            assert (await stub.Usage(pb.UsageRequest(key="child"), metadata=md)).inodes == 1
            await stub.Cleanup(pb.CleanupRequest(), metadata=md)
    finally:
        await daemon.stop()
    assert not sock.exists()


# -- configuration and CLI -------------------------------------------------------------------------------


def test_node_config(tmp_path: Path) -> None:
    assert NodeConfig().socket == Path("/run/imgaccel/snapshotter.sock")
    cfg = tmp_path / "node.yml"
    cfg.write_text("root: /srv/imgaccel\nplain_http: ['registry.lan:5000']\n")
    c = load_node_config(cfg, socket=Path("/tmp/x.sock"))
    assert (c.root, c.socket) == (Path("/srv/imgaccel"), Path("/tmp/x.sock"))
    assert c.use_plain_http("registry.lan:5000") and c.use_plain_http("127.0.0.1:5000")
    assert not c.use_plain_http("registry.example.com")
    for text, where in (("roots: /x\n", "roots"), ("root: relative\n", "root"), ("- a\n", "mapping"), (":\n:", "YAML")):
        cfg.write_text(text)
        with pytest.raises(ConfigError, match=where) as e:
            load_node_config(cfg)
        assert "\n" not in str(e.value)
    snippet = containerd_snippet(c)
    assert '[proxy_plugins.imgaccel]\n  type = "snapshot"\n  address = "/tmp/x.sock"' in snippet
    assert 'snapshotter = "imgaccel"' in snippet and "disable_snapshot_annotations = false" in snippet
    r = CliRunner().invoke(node_config, ["--socket", "/run/x.sock"])
    assert r.exit_code == 0 and 'address = "/run/x.sock"' in r.output
    cfg.write_text("bogus: 1\n")
    r = CliRunner().invoke(node_config, ["--config", str(cfg)])
    assert r.exit_code == 2 and "bogus" in r.output


def test_the_reference_config_lists_every_field_at_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """deploy/node.yaml documents the node configuration: every field, each at its default."""
    text = (REPO / "deploy" / "node.yaml").read_text()
    assert set(yaml.safe_load(text)) == set(NodeConfig.model_fields)
    assert load_node_config(REPO / "deploy" / "node.yaml") == NodeConfig()

    def example(key: str) -> list[str]:  # the commented-out example above "<key>: null"
        lines = text.splitlines()
        end = lines.index(f"{key}: null")
        start = lines.index(f"#   {key}:", 0, end)
        return [line[1:] for line in lines[start + 1 : end]]

    for line in example("cri_proxy"):  # it holds CriProxyConfig's defaults
        key, _, value = line.split("#")[0].strip().partition(":")
        assert str(getattr(CriProxyConfig(), key)) == value.strip(), line
    monkeypatch.setenv("PREWARM_NODE_TOKEN", "x")
    prewarm = yaml.safe_load("\n".join(line.removeprefix("  ") for line in example("prewarm")))
    assert PrewarmAgentConfig.model_validate(prewarm).node_name == "gpu-node-17"


# -- real containerd ---------------------------------------------------------------------------------------


class DaemonProcess:
    """The node daemon in a child process (so it can be SIGKILLed), with or without a test hook."""

    def __init__(self, workdir: Path, registry: Registry) -> None:
        self.ctr: list[str] = []  # set once containerd runs: start() waits until containerd reaches us
        self.workdir = workdir
        self.registry = registry
        self.socket = workdir / "imgaccel.sock"
        self.root = workdir / "imgaccel-root"
        self.record = workdir / "hook-calls.jsonl"
        self.proc: subprocess.Popen[bytes] | None = None
        self.config: Path | None = None

    def start(self, hook: str | None, config: Path | None = None) -> None:
        """``hook``: None (the real CLI, no remote layers), "extract" or "decline" (tests.remote_layers);
        ``config``: a node configuration YAML for the real CLI (kept for later restarts)."""
        self.config = config = config or self.config
        assert self.proc is None and (config is None or hook is None)
        common = ["--socket", str(self.socket), "--root", str(self.root)]
        common += ["--config", str(config)] if config is not None else []
        if hook is None:
            code = "from imgaccel.cli.node_commands import snapshotter; snapshotter()"
            cmd = [sys.executable, "-c", code, *common, "--cache-dir", str(self.workdir / "chunk-cache")]
        else:
            cmd = [sys.executable, "-m", "tests.remote_layers", *common, "--registry-root", str(self.registry.root),
                   "--layers", str(self.workdir / "layers"), "--record", str(self.record)]  # fmt: skip
            cmd += ["--decline"] if hook == "decline" else []
        with open(self.workdir / "daemon.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=REPO)
        deadline = time.monotonic() + 30
        while True:
            try:
                with grpc.insecure_channel(f"unix://{self.socket}") as ch:
                    list(pb_grpc.SnapshotsStub(ch).List(pb.ListSnapshotsRequest(), timeout=2))
                break
            except grpc.RpcError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"daemon did not start: {self.log()[-2000:]}") from None
                time.sleep(0.2)
        # containerd's connection to a restarted daemon comes back after grpc-go's reconnect backoff;
        # until then its calls fail with "connection closed: unavailable" (ctr does not retry, kubelet
        # does). Probe with calls that reach the daemon (``snapshots ls`` is answered by containerd).
        deadline = time.monotonic() + 60
        probe = [*self.ctr, "--namespace", "imgaccel-probe", "snapshots", "--snapshotter", "imgaccel"]
        while self.ctr:
            made = subprocess.run([*probe, "prepare", "probe"], capture_output=True, text=True, timeout=30)
            made_ok = made.returncode == 0 or "already exists" in made.stderr
            if made_ok and subprocess.run([*probe, "rm", "probe"], capture_output=True, timeout=30).returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd does not reach the daemon: {made.stderr.strip()}")
            time.sleep(0.3)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        return code

    def list_snapshots(self) -> list[tuple[str, str, int, dict[str, str]]]:
        """(name, parent, kind, labels) of every snapshot, straight from the daemon."""
        with grpc.insecure_channel(f"unix://{self.socket}") as ch:
            infos = [i for r in pb_grpc.SnapshotsStub(ch).List(pb.ListSnapshotsRequest(), timeout=10) for i in r.info]
        # containerd removes backend snapshots in a later GC pass: leave out start()'s probes
        return sorted((i.name, i.parent, i.kind, dict(i.labels)) for i in infos if "probe" not in i.name)

    def log(self) -> str:
        return (self.workdir / "daemon.log").read_text(errors="replace")

    def calls(self) -> list[dict[str, object]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]


@contextmanager
def node_with_daemon(work: Path, registry: Registry) -> Iterator[tuple[list[str], DaemonProcess]]:
    """containerd (CRI enabled, pulling through imgaccel) and the daemon's process handle (not
    started); afterwards the daemon is stopped and every mount it made is taken down."""
    daemon = DaemonProcess(work, registry)
    extra = f"""
[proxy_plugins.imgaccel]
  type = "snapshot"
  address = "{daemon.socket}"
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "imgaccel"
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{registry.host}"]
    endpoint = ["http://{registry.host}"]
"""
    (work / "containerd").mkdir()
    try:
        with running_containerd(work / "containerd", extra) as ctr:
            daemon.ctr = ctr
            try:
                yield ctr, daemon
            finally:
                if daemon.proc is not None:
                    daemon.stop()
    finally:
        asyncio.run(unmount_all(daemon.root))  # the real daemon's FUSE data mount and holder


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Iterator[tuple[list[str], DaemonProcess]]:
    with node_with_daemon(tmp_path_factory.mktemp("node"), registry) as found:
        yield found


@pytest.fixture
def daemon(node: tuple[list[str], DaemonProcess]) -> Iterator[DaemonProcess]:
    d = node[1]
    yield d
    if d.proc is not None:
        code = d.stop()
        assert code == 0, d.log()[-2000:]  # SIGTERM: a graceful stop
        assert not d.socket.exists()


def ctr_run(ctr: list[str], *args: str, timeout: float = 300) -> str:
    r = subprocess.run([*ctr, *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(args)}: {r.stderr[-2000:]}"
    return r.stdout


SCRIPT = "cat /opq/c.txt /etc/motd; ls /old /opq; /bin/busybox stat -c %i /data/hl-a /data/hl-b; sha256sum /data/hl-b"


def check_image_view(out: str) -> None:
    lines = out.splitlines()
    assert lines[:2] == ["only this survives in opq", "layer 2 motd"], out
    assert lines[2:7] == ["/old:", "keep.txt", "", "/opq:", "c.txt"], out  # a whiteout, an opaque directory
    assert lines[7] == lines[8]  # a hardlink stays one inode
    assert lines[9].split() == [hashlib.sha256(real_bytes(70_000, "libz")).hexdigest(), "/data/hl-b"]


def blobs(ctr: list[str]) -> set[str]:
    """The digests in containerd's content store (of the namespace ``ctr`` names)."""
    return {line.split()[0] for line in ctr_run(ctr, "content", "ls", "-q").splitlines() if line.strip()}


def layer_digests(registry: Registry) -> list[str]:
    manifest = get_json(f"http://{registry.host}/v2/fixtures/app/manifests/v1")
    return [layer["digest"] for layer in manifest["layers"]]


@pytest.mark.timeout(600)
@NEEDS_CONTAINERD
def test_plain_pull_and_run(node: tuple[list[str], DaemonProcess], daemon: DaemonProcess, images: dict[str, str],
                            registry: Registry) -> None:  # fmt: skip
    ctr = [*node[0], "--namespace", "plain"]
    daemon.start(None)
    ref = images["app"]
    ctr_run(ctr, "images", "pull", "--plain-http", "--snapshotter", "imgaccel", ref)
    assert set(layer_digests(registry)) <= blobs(ctr)  # no hook: containerd fetched and unpacked them
    check_image_view(ctr_run(ctr, "run", "--rm", "--snapshotter", "imgaccel", ref, "look", "/bin/sh", "-c", SCRIPT))

    writes = "echo changed > /etc/motd; echo new > /new.txt; rm /old/keep.txt; cat /etc/motd"
    assert ctr_run(ctr, "run", "--snapshotter", "imgaccel", ref, "writer", "/bin/sh", "-c", writes) == "changed\n"
    try:
        mount = ctr_run(ctr, "snapshots", "--snapshotter", "imgaccel", "mounts", "/mnt", "writer")
        opts = dict(o.split("=", 1) for o in mount.split(" -o ", 1)[1].strip().split(",") if "=" in o)
        upper, lowers = Path(opts["upperdir"]), [Path(p) for p in opts["lowerdir"].split(":")]
        assert upper.parent.parent == daemon.root / "snapshots" and len(lowers) == 3
        assert (upper / "etc/motd").read_text() == "changed\n" and (upper / "new.txt").read_text() == "new\n"
        assert (upper / "old/keep.txt").is_char_device()  # deleting a lower file leaves a whiteout upstairs
        assert (lowers[1] / "etc/motd").read_text() == "layer 2 motd\n"  # the layers are untouched
        assert (lowers[2] / "old/keep.txt").read_text() == "kept\n"
        assert not any((low / "new.txt").exists() for low in lowers)
    finally:
        ctr_run(ctr, "containers", "rm", "writer")
    again = ctr_run(ctr, "run", "--rm", "--snapshotter", "imgaccel", ref, "fresh", "/bin/sh", "-c", "cat /etc/motd")
    assert again == "layer 2 motd\n"


@pytest.mark.timeout(600)
@NEEDS_CONTAINERD
@pytest.mark.skipif(CTR_REMOTE is None, reason="missing ctr-remote (Debian package stargz-snapshotter)")
def test_remote_layers_skip_the_download(node: tuple[list[str], DaemonProcess], daemon: DaemonProcess,
                                         images: dict[str, str], registry: Registry) -> None:  # fmt: skip
    ctr = [*node[0], "--namespace", "remote"]
    daemon.start("extract")
    ref = images["app"]
    assert CTR_REMOTE is not None
    remote = [CTR_REMOTE, *node[0][1:], "--namespace", "remote"]
    ctr_run(remote, "image", "rpull", "--snapshotter", "imgaccel", "--plain-http", ref)
    digests = layer_digests(registry)
    assert not set(digests) & blobs(ctr)  # the layers were never fetched
    assert len(blobs(ctr)) == 2  # the manifest and the config
    prepared = [c for c in daemon.calls() if c["op"] == "prepare"]
    assert [c["labels"]["containerd.io/snapshot/remote/stargz.digest"] for c in prepared] == digests  # type: ignore[index]
    snaps = ctr_run(ctr, "snapshots", "--snapshotter", "imgaccel", "ls")
    assert snaps.count("Committed") == 3
    check_image_view(ctr_run(ctr, "run", "--rm", "--snapshotter", "imgaccel", ref, "lazy", "/bin/sh", "-c", SCRIPT))
    ctr_run(ctr, "images", "rm", "--sync", ref)  # containerd's GC removes the snapshots: the hook releases them
    deadline = time.monotonic() + 30
    while len([c for c in daemon.calls() if c["op"] == "remove"]) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len([c for c in daemon.calls() if c["op"] == "remove"]) == 3


@pytest.mark.timeout(600)
@NEEDS_CONTAINERD
def test_cri_pull_labels_reach_the_hook(node: tuple[list[str], DaemonProcess], daemon: DaemonProcess,
                                        images: dict[str, str], registry: Registry) -> None:  # fmt: skip
    ctr = [*node[0], "--namespace", "k8s.io"]
    daemon.start("extract")
    ref = images["app"]
    address = node[0][node[0].index("--address") + 1]
    with grpc.insecure_channel(f"unix://{address}") as ch:
        stub = cri_grpc.ImageServiceStub(ch)
        pulled = stub.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=ref)), timeout=300)
        assert pulled.image_ref.startswith("sha256:")
        status = stub.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=ref)), timeout=60)
        assert status.image.id == pulled.image_ref and ref in status.image.repo_tags
        prepared = [c for c in daemon.calls() if c["op"] == "prepare" and c["namespace"] == "k8s.io"]
        assert len(prepared) == 3
        manifest_digest = status.image.repo_digests[0].split("@", 1)[1]
        for call, digest in zip(prepared, layer_digests(registry), strict=True):
            labels = call["labels"]
            assert isinstance(labels, dict)
            assert labels["containerd.io/snapshot/cri.image-ref"] == ref
            assert labels["containerd.io/snapshot/cri.manifest-digest"] == manifest_digest
            assert labels["containerd.io/snapshot/cri.layer-digest"] == digest
            assert labels["containerd.io/snapshot.ref"].startswith("sha256:")
        assert not set(layer_digests(registry)) & blobs(ctr)
        stub.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=pulled.image_ref)), timeout=60)
        gone = stub.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=ref)), timeout=60)
        assert not gone.HasField("image")


@pytest.mark.timeout(600)
@NEEDS_CONTAINERD
def test_daemon_killed_and_restarted_knows_snapshots(node: tuple[list[str], DaemonProcess], daemon: DaemonProcess,
                                                     images: dict[str, str]) -> None:  # fmt: skip
    ctr = [*node[0], "--namespace", "restart"]
    daemon.start(None)
    ref = images["app"]
    ctr_run(ctr, "images", "pull", "--plain-http", "--snapshotter", "imgaccel", ref)
    ctr_run(ctr, "snapshots", "--snapshotter", "imgaccel", "prepare", "scratch", _top_layer(ctr))
    before = ctr_run(ctr, "snapshots", "--snapshotter", "imgaccel", "ls")
    assert before.count("Committed") == 3 and before.count("Active") == 1
    own_before = daemon.list_snapshots()  # containerd answers `ls` from its own records: ask the daemon too
    assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    daemon.start(None)  # a stale socket is left behind: the new daemon replaces it
    after = ctr_run(ctr, "snapshots", "--snapshotter", "imgaccel", "ls")
    assert sorted(after.splitlines()) == sorted(before.splitlines())
    assert daemon.list_snapshots() == own_before
    ctr_run(ctr, "snapshots", "--snapshotter", "imgaccel", "rm", "scratch")
    out = ctr_run(ctr, "run", "--rm", "--snapshotter", "imgaccel", ref, "after", "/bin/sh", "-c", SCRIPT)
    check_image_view(out)


def _top_layer(ctr: list[str]) -> str:
    rows = [line.split() for line in ctr_run(ctr, "snapshots", "--snapshotter", "imgaccel", "ls").splitlines()[1:]]
    parents = {r[1] for r in rows if len(r) == 3}
    (top,) = [r[0] for r in rows if r[0] not in parents]
    return top
