"""Prewarm tasks end to end, all real processes: the real registry behind a counting (and, where
a test says so, slow or 429-answering) proxy as the "remote" registry, two ``imgaccel
cachenode`` processes, ``imgaccel serve`` running the tasks, and three node daemons (``imgaccel
snapshotter``, separate roots, caches and sockets) that poll it for assignments; the first
one also serves a real containerd.

References name the proxy, so everything the registry sends is counted there; cache nodes
store what passes through them, so each test prewarms an image of its own."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from fixtures.build_images import push, unique_image
from imgaccel.formats import layer_index as li
from imgaccel.formats.rendezvous import rendezvous_order
from imgaccel.pusher.client import RegistryClient
from imgaccel.pusher.reference import parse_reference
from imgaccel.reader.accelerated_image import open_image
from imgaccel.reader.profiles import build_profile, push_profile
from tests.containerd import MISSING
from tests.erofs_mount import missing_for_mounts
from tests.fault_proxy import FaultProxy
from tests.helpers import ROOT, get_json, run_cli
from tests.registry import Registry, free_port
from tests.service import ServiceProcess, make_service
from tests.test_snapshotter import DaemonProcess, ctr_run, node_with_daemon

WHY = missing_for_mounts("erofs", "overlay") or (f"missing {', '.join(MISSING)}" if MISSING else "")
if not os.path.exists("/dev/fuse"):
    WHY = WHY or "no /dev/fuse"
pytestmark = pytest.mark.skipif(bool(WHY), reason=WHY or "-")

TOKEN = "cluster-token-0123456789abcdef"  # the cache nodes' cluster token
API_TOKEN = "api-token-prewarm-0123"
NODE_TOKEN = "node-token-prewarm-0123"
IMAGES = ("hot", "full", "throttle", "kill-a", "kill-b", "kill-c", "restart", "ghost")
NODES = {"n1": {"region": "test", "card": "h200"}, "n2": {"region": "test", "card": "h200"},
         "n3": {"region": "test", "card": "a10"}}  # fmt: skip
WORKING_SET = ["/bin/busybox", "/etc/motd"]  # what the profiles name: a container's `cat /etc/motd`


@dataclass
class CacheNodeProcess:
    config: Path
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "imgaccel.cli.main", "cachenode", "--config", str(self.config)],
                stdout=out, stderr=out, cwd=ROOT,
            )  # fmt: skip
        deadline = time.monotonic() + 20
        while True:
            try:
                _get(f"http://{self.address}/healthz")
                return
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()[-2000:]
                time.sleep(0.1)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(20)
            self.proc = None


def _get(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        return bytes(r.read())


@dataclass
class Cluster:
    registry: Registry
    proxy: FaultProxy
    refs: dict[str, str]  # image name -> accelerated reference (through the proxy)
    layers: dict[str, str]  # image name -> its layer digest
    hot_bytes: dict[str, int]  # image name -> compressed bytes of its profile's chunks
    cache_nodes: list[CacheNodeProcess]
    service: ServiceProcess
    daemons: dict[str, DaemonProcess]
    ctr: list[str]
    seen: list[str] = field(default_factory=list)

    def create(self, body: dict[str, Any]) -> tuple[int, Any]:
        return self.service.api("POST", "/api/v1/prewarm/tasks", body)

    def task(self, task_id: str) -> dict[str, Any]:
        status, body = self.service.api("GET", f"/api/v1/prewarm/tasks/{task_id}")
        assert status == 200, body
        return dict(body)

    def wait(self, task_id: str, states: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
             timeout: float = 120) -> dict[str, Any]:  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            task = self.task(task_id)
            self.seen.append(task["state"])
            if task["state"] in states:
                return task
            assert time.monotonic() < deadline, f"task {task_id} stayed {task['state']}: {json.dumps(task)[:3000]}"
            time.sleep(0.1)

    def layer_egress(self, name: str) -> int:
        """Bytes of ``name``'s layer blob the registry sent so far."""
        ref = parse_reference(self.refs[name])
        return self.proxy.body_bytes[f"/v2/{ref.repository}/blobs/{self.layers[name]}"]


def convert_with_profile(registry: Registry, proxy: FaultProxy, work: Path, name: str) -> tuple[str, str, int]:
    """A fresh image converted in full mode (small chunks) with a profile of ``WORKING_SET``:
    (accelerated reference through the proxy, its layer digest, the profile's compressed bytes)."""
    source = f"{registry.host}/prewarm/{name}:v1"
    push(unique_image(work, f"prewarm-{name}"), "v1", source)
    r = run_cli("convert", source, "--mode", "full", "--chunk-size", "256KiB")
    assert r.code == 0, r.err
    direct = parse_reference(source + "_containerd_accelerated")

    async def record() -> tuple[str, int]:
        async with RegistryClient(direct.registry) as client:
            image = await open_image(client, direct)
            for path in WORKING_SET:
                await image.read_file(path)
            profile = build_profile(image, "startup")
            await push_profile(client, image, profile)
            chunks = [image.layers[c.layer].index.chunks[c.chunk] for c in profile.chunks]
            assert all(c.c_digest for c in chunks)
            return image.layer_digests[0], sum(c.c_size for c in chunks)

    layer, hot = asyncio.run(record())
    return f"{proxy.host}/prewarm/{name}:v1_containerd_accelerated", layer, hot


def split_ports(layers: list[str]) -> tuple[int, int]:
    """Two free ports whose cache nodes each own at least one of ``layers`` (rendezvous)."""
    while True:
        a, b = free_port(), free_port()
        owners = {rendezvous_order([f"127.0.0.1:{a}", f"127.0.0.1:{b}"], d)[0] for d in layers}
        if a != b and len(owners) == 2:
            return a, b


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("prewarm")
    proxy = FaultProxy(registry.host, lambda m, p, n: None).start()
    with ExitStack() as stack:
        stack.callback(proxy.stop)
        refs, layers, hot = {}, {}, {}
        for name in IMAGES:
            refs[name], layers[name], hot[name] = convert_with_profile(registry, proxy, work, name)
        nodes = []
        for i, port in enumerate(split_ports([layers["kill-a"], layers["kill-b"], layers["kill-c"]])):
            config = work / f"cachenode-{i}.yaml"
            config.write_text(yaml.safe_dump({
                "listen": f"127.0.0.1:{port}", "data_dir": str(work / f"cachenode-{i}"),
                "cluster_tokens": [{"value": TOKEN}], "upstreams": [{"host": proxy.host}],
            }))  # fmt: skip
            node = CacheNodeProcess(config, port, work / f"cachenode-{i}.log")
            node.start()
            stack.callback(node.stop)
            nodes.append(node)
        service = make_service(work / "service", {
            "workers": 1, "reconcile_interval": 0, "rules": [{"repository": "none", "enabled": False}],
            "api_auth": {"token": {"value": API_TOKEN}},
            "prewarm": {
                "cache_nodes": [{"address": n.address} for n in nodes], "cache_node_token": {"value": TOKEN},
                "node_token": {"value": NODE_TOKEN}, "node_poll_seconds": 0.5, "node_timeout": 600,
                "quota": "40MB",
            },
        }, token=API_TOKEN).start()  # fmt: skip
        stack.callback(service.stop)
        daemons: dict[str, DaemonProcess] = {}
        ctr: list[str] = []
        for name, labels in NODES.items():
            (work / name).mkdir()
            config = work / name / "node.yaml"
            config.write_text(yaml.safe_dump({
                "background_fetch": "off", "profile_label": None, "log_level": "debug",
                "cache_nodes": [{"address": n.address} for n in nodes], "cache_node_token": TOKEN,
                "prewarm": {"service": service.url, "token": {"value": NODE_TOKEN}, "node_name": name,
                            "labels": labels, "poll_seconds": 0.5},
            }))  # fmt: skip
            if name == "n1":  # containerd runs containers on this one
                ctr, daemon = stack.enter_context(node_with_daemon(work / name, registry))
            else:
                daemon = DaemonProcess(work / name, registry)
                stack.callback(_stop_daemon, daemon)
            daemon.start(None, config)
            daemons[name] = daemon
        yield Cluster(registry, proxy, refs, layers, hot, nodes, service, daemons, ctr)


def _stop_daemon(daemon: DaemonProcess) -> None:
    from tests.test_snapshotter import unmount_all

    try:
        if daemon.proc is not None:
            daemon.stop()
    finally:
        asyncio.run(unmount_all(daemon.root))


def wait_nodes(cluster: Cluster) -> None:
    deadline = time.monotonic() + 30
    while True:
        status, body = cluster.service.api("GET", "/api/v1/prewarm/nodes")
        assert status == 200, body
        if {n["name"] for n in body["nodes"]} >= set(NODES):
            return
        assert time.monotonic() < deadline, f"nodes did not poll: {body}"
        time.sleep(0.2)


def node_status(daemon: DaemonProcess) -> dict[str, Any]:
    r = run_cli("node", "status", "--root", str(daemon.root), "--json")
    assert r.code == 0, r.err
    return json.loads(r.out)  # type: ignore[no-any-return]


def cache_files(daemon: DaemonProcess) -> int:
    return sum(len(files) for _, _, files in os.walk(daemon.workdir / "chunk-cache"))


@pytest.mark.timeout(300)
def test_hot_prewarm_reaches_the_registry_once_for_all_nodes(cluster: Cluster) -> None:
    wait_nodes(cluster)
    ref = cluster.refs["hot"]
    status, task = cluster.create({"images": [ref], "mode": "hot"})
    assert status == 201, task
    plan = task["plan"]
    assert plan["targets"] == [n.address for n in cluster.cache_nodes]
    assert plan["images"][0]["profile_chunks"] > 0
    done = cluster.wait(task["id"])
    assert done["state"] == "succeeded", done
    assert done["bytes_done"] == done["bytes_total"] == plan["total_bytes"] > 0
    after_cache_nodes = cluster.layer_egress("hot")
    layer = get_json(f"http://{cluster.proxy.host}/v2/prewarm/hot/manifests/v1_containerd_accelerated")["layers"][0]
    (blob,) = plan["images"][0]["blobs"]
    assert blob["digest"] == layer["digest"] and blob["bytes"] >= cluster.hot_bytes["hot"]
    # The registry sent the hot chunks and the TOC once to a cache node, and the TOC once more to
    # the planner: nothing else (no cache node filled the whole blob). Multi-range answers add
    # their part headers (under 200 bytes a part).
    payload = blob["bytes"] + int(layer["annotations"][li.ANN_TOC_SIZE])  # the TOC is in the plan too
    assert payload <= after_cache_nodes <= payload + 200 * (len(blob["chunks"]) + 1)
    assert after_cache_nodes < layer["size"] / 2

    # Now the three nodes warm the same image: everything comes from the cache nodes.
    status, task = cluster.create({"images": [ref], "mode": "hot", "nodes": "region=test"})
    assert status == 201, task
    assert sorted(task["plan"]["targets"]) == sorted(NODES)
    done = cluster.wait(task["id"])
    assert done["state"] == "succeeded", done
    for t in done["targets"]:
        assert t["kind"] == "node" and t["state"] == "succeeded" and t["bytes_done"] > 0, t
    # Only the planner's own read of the TOC reached the registry: the nodes' TOC and chunk reads
    # all came from the cache nodes.
    toc = int(layer["annotations"][li.ANN_TOC_SIZE])
    assert cluster.layer_egress("hot") == after_cache_nodes + toc, "a node fetched from the registry"
    after_nodes = after_cache_nodes + toc
    for name, daemon in cluster.daemons.items():
        fetched = sum(c["bytes_fetched"] for c in node_status(daemon)["cache_nodes"])
        assert fetched >= cluster.hot_bytes["hot"], (name, node_status(daemon)["cache_nodes"])

    # A container on n1 starts from what was prewarmed.
    ctr = [*cluster.ctr, "--namespace", "prewarm"]
    from tests.test_lazy_containerd import rpull

    rpull(ctr, ref)
    out = ctr_run(ctr, "run", "--rm", "--snapshotter", "imgaccel", ref, "hot-motd", "/bin/cat", "/etc/motd")
    assert out == "unique\n"
    # The kernel reads the layer in pages, which may reach into a neighbouring chunk the profile
    # (whole files read in-process) did not name: only such a sliver may still come from afar.
    assert cluster.layer_egress("hot") - after_nodes < 64 << 10


@pytest.mark.timeout(300)
def test_full_prewarm_reaches_only_the_labelled_nodes_and_can_be_saved_as_a_template(cluster: Cluster) -> None:
    wait_nodes(cluster)
    before = {name: cache_files(d) for name, d in cluster.daemons.items()}
    args = ["prewarm", "create", cluster.refs["full"], "--mode", "full", "--nodes", "card=h200", "--watch",
            "--server", cluster.service.url, "--token", API_TOKEN]  # fmt: skip
    r = run_cli(*args)
    assert r.code == 0, r.out + r.err
    assert "plan: 1 image(s) to 2 target(s)" in r.err
    task_id = r.out.split()[0]
    done = cluster.task(task_id)
    assert done["state"] == "succeeded" and sorted(t["name"] for t in done["targets"]) == ["n1", "n2"], done
    for name in ("n1", "n2"):
        assert cache_files(cluster.daemons[name]) > before[name]
    assert cache_files(cluster.daemons["n3"]) == before["n3"], "n3 does not match card=h200"

    r = run_cli("prewarm", "template", "save", task_id, "h200-full", "--server", cluster.service.url,
                "--token", API_TOKEN)  # fmt: skip
    assert r.code == 0, r.err
    listed = run_cli("prewarm", "template", "list", "--server", cluster.service.url, "--token", API_TOKEN)
    assert "h200-full  full  1 image(s)" in listed.out and "nodes card=h200" in listed.out
    status, again = cluster.create({"template": "h200-full"})
    assert status == 201, again
    assert again["spec"]["images"] == [cluster.refs["full"]] and again["spec"]["nodes"] == "card=h200"
    assert cluster.wait(again["id"])["state"] == "succeeded"


@pytest.mark.timeout(300)
def test_quota_refuses_before_any_byte_moves_and_a_sixth_task_waits(cluster: Cluster) -> None:
    ref = cluster.refs["ghost"]
    toc = int(get_json(f"http://{cluster.proxy.host}/v2/prewarm/ghost/manifests/v1_containerd_accelerated")
              ["layers"][0]["annotations"][li.ANN_TOC_SIZE])  # fmt: skip
    before = cluster.layer_egress("ghost")
    every = [cluster.refs[name] for name in IMAGES]  # ~2.7 MB each, to three nodes: over 40 MB
    status, refused = cluster.create({"images": every, "mode": "full", "nodes": "region=test"})
    assert status == 422, refused
    assert "over the per-task quota" in refused["error"] and refused["plan"]["total_bytes"] > refused["plan"]["quota"]
    assert cluster.task(refused["task"])["state"] == "failed"
    assert cluster.layer_egress("ghost") - before <= toc, "planning read more than the index"

    # A node that polls once and never reports: tasks for it run until cancelled.
    status, body = cluster.service.api("POST", "/api/v1/prewarm/nodes/ghost/poll", {"labels": {"ghost": "yes"}},
                                       token=NODE_TOKEN)  # fmt: skip
    assert status == 200, body
    ids = []
    for _ in range(6):
        status, task = cluster.create({"images": [ref], "mode": "hot", "nodes": "ghost=yes"})
        assert status == 201, task
        ids.append(task["id"])
    for task_id in ids[:5]:
        cluster.wait(task_id, ("running",))
    time.sleep(2)  # the scheduler had time to start it, if it would
    assert cluster.task(ids[5])["state"] == "queued"
    status, body = cluster.service.api("POST", f"/api/v1/prewarm/tasks/{ids[0]}/cancel")
    assert status == 200 and body["state"] == "cancelled", body
    cluster.wait(ids[5], ("running",), timeout=20)
    # The ghost's poll hands out the assignments of the running tasks only.
    status, body = cluster.service.api("POST", "/api/v1/prewarm/nodes/ghost/poll", {"labels": {"ghost": "yes"}},
                                       token=NODE_TOKEN)  # fmt: skip
    assert sorted(a["task_id"] for a in body["assignments"]) == sorted(ids[1:])
    for task_id in ids[1:]:
        cluster.service.api("POST", f"/api/v1/prewarm/tasks/{task_id}/cancel")
        assert cluster.task(task_id)["state"] == "cancelled"
    status, body = cluster.service.api("POST", "/api/v1/prewarm/nodes/ghost/poll", {"labels": {}}, token="wrong")
    assert status == 401


@pytest.mark.timeout(300)
def test_a_registry_answering_429_throttles_the_task_which_completes(cluster: Cluster) -> None:
    layer_path = f"/v2/prewarm/throttle/blobs/{cluster.layers['throttle']}"
    first = cluster.proxy.seen[("GET", layer_path)]  # (the quota test's planning read its TOC)
    cluster.proxy.rule = lambda method, path, n: "429" if path == layer_path and n <= first + 3 else None
    try:
        status, task = cluster.create({"images": [cluster.refs["throttle"]], "mode": "full"})
        assert status == 201, task
        cluster.seen.clear()
        done = cluster.wait(task["id"], timeout=180)
    finally:
        cluster.proxy.rule = lambda method, path, n: None
    assert done["state"] == "succeeded", done
    assert cluster.proxy.faults["429"] >= 1
    # The cache node passed the 429 on; the task showed it while it waited, then went on.
    assert "throttled" in cluster.seen, cluster.seen
    assert "was throttled by the registry" in (done["message"] or ""), done
    assert done["concurrency"] < 4


@pytest.mark.timeout(300)
def test_a_cache_node_killed_mid_task_fails_its_share_only(cluster: Cluster) -> None:
    names = ["kill-a", "kill-b", "kill-c"]
    addresses = [n.address for n in cluster.cache_nodes]
    owner = rendezvous_order(addresses, cluster.layers["kill-a"])[0]  # each node owns one of the layers at least
    victim = next(n for n in cluster.cache_nodes if n.address == owner)
    survivor = next(n for n in cluster.cache_nodes if n is not victim)
    cluster.proxy.rate = 1 << 20  # the remote registry is slow: the task is still running when the node dies
    try:
        status, task = cluster.create({"images": [cluster.refs[n] for n in names], "mode": "full"})
        assert status == 201, task
        deadline = time.monotonic() + 60
        while not any(t["name"] == victim.address and t["bytes_done"] > 0 for t in cluster.task(task["id"])["targets"]):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        victim.kill()
        done = cluster.wait(task["id"], timeout=240)
    finally:
        cluster.proxy.rate = None
    targets = {t["name"]: t for t in done["targets"]}
    assert done["state"] == "failed" and victim.address in done["error"], done
    assert targets[victim.address]["state"] == "failed"
    assert targets[survivor.address]["state"] == "succeeded"
    assert targets[survivor.address]["bytes_done"] == targets[survivor.address]["bytes_total"] > 0

    # Nodes fall back to the other cache node, then the registry: a hot prewarm still succeeds.
    status, task = cluster.create({"images": [cluster.refs["kill-a"]], "mode": "hot", "nodes": "card=a10"})
    assert status == 201, task
    assert cluster.wait(task["id"])["state"] == "succeeded"
    victim.start()  # back, with what it stored before it died


@pytest.mark.timeout(300)
def test_a_task_resumes_after_the_service_restarts(cluster: Cluster) -> None:
    cluster.proxy.rate = 1 << 20
    try:
        status, task = cluster.create({"images": [cluster.refs["restart"]], "mode": "full"})
        assert status == 201, task
        deadline = time.monotonic() + 60
        while cluster.task(task["id"])["bytes_done"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        cluster.service.kill()
        cluster.service.start()
        done = cluster.wait(task["id"], timeout=240)
    finally:
        cluster.proxy.rate = None
    assert done["state"] == "succeeded", done
    assert done["attempts"] == 2
