"""Profiles for every image (``Rule.profile``, ``service.auto_profile``): after a conversion the
real service runs the image's entrypoint in a runc sandbox over the lazy mount, and pushes the
chunks it read as a profile referrer. The images here carry a static busybox and an entrypoint
script that reads a known set of files; the profile must cover exactly those, the sandbox must
have no network, a failing profile step must not fail its job, and nothing may be left behind
(mounts, processes, runc containers, cgroups)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import signal
import socket
import subprocess
import tarfile
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from fixtures.build_images import Layout, Member, d, push, sha, tar_bytes
from imgaccel.formats.layer_index import LayerIndex
from imgaccel.formats.profile import Profile
from imgaccel.pusher.client import RegistryClient
from imgaccel.pusher.reference import parse_reference
from imgaccel.reader.accelerated_image import open_image
from imgaccel.reader.profiles import find_profile
from imgaccel.service import auto_profile
from imgaccel.service.service_config import ProfileRule, Rule
from imgaccel.snapshotter.mounts import mounts
from tests.erofs_mount import missing_for_mounts
from tests.registry import Registry
from tests.service import ServiceProcess, make_service, wait_for

WHY = auto_profile.missing_prerequisite() or missing_for_mounts("erofs", "overlay")
needs_sandbox = pytest.mark.skipif(bool(WHY), reason=WHY or "-")
DATA = {name: os.urandom(300_000) for name in "abcd"}  # each file its own full-mode frame (> 128 KiB)
MARKER = "86399"  # the workload's `sleep` argument, to find it in /proc
PASSWD = b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/:/bin/sh\n"
# Reads /data/a only when it runs as "app" (uid 1000 from the image's /etc/passwd), then /data/c,
# then sleeps until the profile step kills it.
READER = f"""#!/bin/sh
if [ "$(/bin/busybox id -u)" = 1000 ]; then /bin/busybox cat /data/a > /dev/null; fi
/bin/busybox cat /data/c > /dev/null
exec /bin/busybox sleep {MARKER}
"""


def image_layout(tmp_path: Path, name: str, script: str, entrypoint: list[str], user: str = "") -> Path:
    """A one-layer image: static busybox, /data/{a,b,c,d}, /etc/passwd and /start.sh."""
    files = [
        d("bin"),
        Member("bin/busybox", Path("/bin/busybox").read_bytes(), mode=0o755),
        Member("bin/sh", type=tarfile.SYMTYPE, linkname="busybox", mode=0o777),
        d("etc"),
        Member("etc/passwd", PASSWD),
        Member("start.sh", script.encode(), mode=0o755),
        d("data"),
        *[Member(f"data/{n}", data) for n, data in DATA.items()],
    ]
    tar = tar_bytes(files)
    layout = Layout(tmp_path / name)
    config = {
        "architecture": "amd64" if os.uname().machine == "x86_64" else "arm64",
        "os": "linux",
        "config": {"Entrypoint": entrypoint, "Env": ["PATH=/bin"], "User": user, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [sha(tar)]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": layout.blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"),
        "layers": [layout.blob(gzip.compress(tar, 1), "application/vnd.oci.image.layer.v1.tar+gzip")],
    }
    layout.tag(layout.blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json"), "v1")
    return layout.root


@dataclass
class Env:
    registry: Registry
    service: ServiceProcess
    data_dir: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Iterator[Env]:
    work = tmp_path_factory.mktemp("auto-profile")
    config = {
        "registries": [{"endpoint": registry.host}],
        "rules": [
            {"repository": "profiled/*", "mode": "full", "profile": {"seconds": 3, "label": "startup"}},
            {"repository": "netprobe/*", "mode": "index", "profile": {"seconds": 20, "label": "startup"}},
            {"repository": "tight/*", "mode": "full", "profile": {"seconds": 20, "memory_limit": 16 << 20}},
        ],
        "reconcile_interval": 0,
    }
    service = make_service(work / "service", config).start()
    try:
        yield Env(registry, service, work / "service" / "data")
    finally:
        service.stop()


def convert(env: Env, tmp_path: Path, repo: str, layout: Path) -> dict[str, Any]:
    """Push ``layout`` as ``repo:v1``, have the service convert it; the finished job."""
    ref = f"{env.registry.host}/{repo}:v1"
    push(layout, "v1", ref)
    status, body = env.service.api("POST", "/api/v1/jobs", {"reference": ref})
    assert status == 202, body
    return env.service.wait_job(lambda j: j["id"] == body["id"] and j["state"] in ("succeeded", "failed"), 60)


def fetch_profile(target: str) -> tuple[Profile | None, list[LayerIndex]]:
    ref = parse_reference(target)

    async def go() -> tuple[Profile | None, list[LayerIndex]]:
        async with RegistryClient(ref.registry) as client:
            image = await open_image(client, ref)
            return await find_profile(client, image, "startup"), [layer.index for layer in image.layers]

    return asyncio.run(go())


def files_touched(profile: Profile, indexes: list[LayerIndex]) -> dict[str, float]:
    """Per /data file: the fraction of its bytes that the profile's chunks cover."""
    out = {}
    for entry in indexes[0].entries:
        if not entry.name.startswith("data/") or entry.type != "reg":
            continue
        start, end = entry.offset, entry.offset + entry.size
        covered = 0
        for c in profile.chunks:
            chunk = indexes[c.layer].chunks[c.chunk]
            covered += max(0, min(end, chunk.u_offset + chunk.u_size) - max(start, chunk.u_offset))
        out[entry.name.removeprefix("data/")] = covered / entry.size
    return out


def leftovers(data_dir: Path) -> list[str]:
    """Anything a profile run of this service left: mounts, run directories, runc containers,
    lazy-mount state, cgroups, processes."""
    root = auto_profile.work_root(data_dir)
    left = [f"mount {m.mountpoint}" for m in mounts() if m.mountpoint.startswith(str(root))]
    runs = root / "runs"
    left += [f"run dir {p}" for p in (runs.iterdir() if runs.is_dir() else [])]
    listed = subprocess.run(["runc", "--root", str(root / "runc"), "list", "-q"], capture_output=True, text=True)
    left += [f"runc container {c}" for c in listed.stdout.split()]
    for state in Path("/run/imgaccel/mounts").glob("*/mountpoint"):
        if state.read_text().strip().startswith(str(root)):
            left.append(f"lazy mount state {state.parent}")
    for m in mounts():
        if m.fstype in ("cgroup", "cgroup2"):
            left += [f"cgroup {p}" for p in Path(m.mountpoint).glob(f"{auto_profile.CONTAINER_PREFIX}*")]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if MARKER.encode() in args or any(str(root).encode() in a for a in args):
            left.append(f"process {cmdline.parent.name}: {b' '.join(args)!r}")
    return left


@needs_sandbox
def test_the_profile_covers_exactly_the_files_the_entrypoint_read(env: Env, tmp_path: Path) -> None:
    layout = image_layout(tmp_path, "reader", READER, ["/bin/sh", "/start.sh"], user="app")
    job = convert(env, tmp_path, "profiled/reader", layout)
    assert job["state"] == "succeeded", job
    outcome = job["progress"]["profile"]
    assert outcome["state"] == "pushed" and outcome["label"] == "startup", outcome
    assert outcome["workload"] == "killed after 3 s", outcome  # the sleep outlived the 3 s
    profile, indexes = fetch_profile(job["target"])
    assert profile is not None and len(profile.chunks) == outcome["chunks"]
    touched = files_touched(profile, indexes)
    assert touched["a"] == 1.0 and touched["c"] == 1.0, touched  # a: the workload ran as uid 1000
    assert touched["b"] == 0.0 and touched["d"] == 0.0, touched
    assert leftovers(env.data_dir) == []


def local_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 9))
        except OSError:
            return None
        address = str(s.getsockname()[0])
    return None if address.startswith("127.") else address


class _Recorder(BaseHTTPRequestHandler):
    seen: list[str] = []  # noqa: RUF012 - shared by the handler instances on purpose

    def do_GET(self) -> None:
        self.seen.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"reached\n")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@needs_sandbox
def test_the_sandbox_has_no_network(env: Env, tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("0.0.0.0", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    hosts = ["127.0.0.1", *filter(None, [local_address()])]
    fetches = "\n".join(f"/bin/busybox wget -q -T 3 -O /tmp/got http://{h}:{port}/from-sandbox" for h in hosts)
    script = f"#!/bin/sh\n{fetches}\n/bin/busybox cat /data/b > /dev/null\n"
    _Recorder.seen = []
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/from-test", timeout=5) as r:
            assert r.read() == b"reached\n"  # reachable from outside the sandbox
        layout = image_layout(tmp_path, "netprobe", script, ["/bin/sh", "/start.sh"])
        job = convert(env, tmp_path, "netprobe/app", layout)
    finally:
        server.shutdown()
        server.server_close()
    assert job["state"] == "succeeded", job
    outcome = job["progress"]["profile"]
    assert outcome["state"] == "pushed", outcome
    assert outcome["workload"].startswith("exited with status 0 after"), outcome  # wget failed at once
    assert _Recorder.seen == ["/from-test"], _Recorder.seen
    profile, indexes = fetch_profile(job["target"])  # index mode: spans straddle files
    assert profile is not None and files_touched(profile, indexes)["b"] == 1.0
    assert leftovers(env.data_dir) == []


@needs_sandbox
def test_the_sandbox_has_a_memory_limit(env: Env, tmp_path: Path) -> None:
    # dd's 64 MiB buffer cannot fit in 16 MiB: dd is killed, and only then is /data/d read.
    script = "#!/bin/sh\n/bin/busybox dd if=/dev/zero of=/dev/null bs=64M count=1 || /bin/busybox cat /data/d\n"
    job = convert(env, tmp_path, "tight/app", image_layout(tmp_path, "tight", script, ["/bin/sh", "/start.sh"]))
    assert job["state"] == "succeeded" and job["progress"]["profile"]["state"] == "pushed", job
    profile, indexes = fetch_profile(job["target"])
    assert profile is not None and files_touched(profile, indexes)["d"] == 1.0
    assert leftovers(env.data_dir) == []


@needs_sandbox
def test_a_failed_profile_step_does_not_fail_the_job(env: Env, tmp_path: Path) -> None:
    layout = image_layout(tmp_path, "broken", "#!/bin/sh\n", ["/no/such/program"])
    job = convert(env, tmp_path, "profiled/broken", layout)
    assert job["state"] == "succeeded" and job["last_error"] is None, job
    outcome = job["progress"]["profile"]
    assert outcome["state"] == "failed" and "runc could not run the sandbox" in outcome["error"], outcome
    assert "/no/such/program" in outcome["error"]
    assert leftovers(env.data_dir) == []


def workload_running() -> bool:
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if MARKER.encode() in cmdline.read_bytes().split(b"\0"):
                return True
    return False


@needs_sandbox
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
def test_a_service_stopped_mid_profile_leaves_nothing(registry: Registry, tmp_path: Path, sig: signal.Signals) -> None:
    """SIGTERM: the worker stops the profile process, which takes the sandbox down; SIGKILL:
    the profile process gets SIGTERM from the kernel (PR_SET_PDEATHSIG) and does the same."""
    config = {
        "registries": [{"endpoint": registry.host}],
        "rules": [{"repository": "slow/*", "mode": "full", "profile": {"seconds": 300}}],
        "reconcile_interval": 0,
    }
    service = make_service(tmp_path / "service", config).start()
    ref = f"{registry.host}/slow/{sig.name.lower()}:v1"
    try:
        push(image_layout(tmp_path, "slow", READER, ["/bin/sh", "/start.sh"]), "v1", ref)
        status, body = service.api("POST", "/api/v1/jobs", {"reference": ref})
        assert status == 202, body
        wait_for(workload_running, 30, "the workload to start")
        assert service.process is not None
        service.process.send_signal(sig)
        service.process.wait(30)
    finally:
        service.stop()
    data_dir = tmp_path / "service" / "data"
    wait_for(lambda: not leftovers(data_dir), 30, "the profile run to be taken down")


def test_sweep_clears_runs_left_behind(tmp_path: Path) -> None:
    run, runc_root = auto_profile.new_run(tmp_path / "auto-profile")
    (run / "scratch").mkdir()
    (run / "config.json").write_text("{}")
    assert auto_profile.sweep(tmp_path / "auto-profile") == [run.name]
    assert not run.exists() and runc_root.is_dir()


def test_profile_rule_validation() -> None:
    rule = Rule.model_validate({"profile": {}})
    assert rule.profile == ProfileRule(seconds=10, label="startup", memory_limit=512 << 20)
    assert Rule().profile is None
    for bad in ({"seconds": 0}, {"seconds": 601}, {"label": ""}, {"label": "-x"}, {"label": "a b"}, {"x": 1}):
        with pytest.raises(ValidationError):
            ProfileRule.model_validate(bad)


def test_the_bundle_is_a_sandbox() -> None:
    process = auto_profile.WorkloadProcess(["/bin/app"], ["PATH=/bin"], "/", 1000, 1000)
    config = auto_profile.bundle_config(process, Path("/x/rootfs"), "imgaccel-profile-1", 64 << 20)
    assert config["root"] == {"path": "/x/rootfs", "readonly": True}
    linux = config["linux"]
    assert {n["type"] for n in linux["namespaces"]} == {"pid", "network", "ipc", "uts", "mount"}
    assert all("path" not in n for n in linux["namespaces"])  # new namespaces: only loopback
    assert linux["resources"]["memory"]["limit"] == 64 << 20
    caps = config["process"]["capabilities"]
    assert all(not c.startswith("CAP_NET") for v in caps.values() for c in v)
    assert "ambient" not in caps and config["process"]["noNewPrivileges"]
    assert {m["destination"] for m in config["mounts"]} >= {"/proc", "/dev", "/tmp", "/run"}


def test_missing_prerequisites_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auto_profile.os, "geteuid", lambda: 1000)
    assert "not running as root" in (auto_profile.missing_prerequisite() or "")
    monkeypatch.setattr(auto_profile.os, "geteuid", lambda: 0)
    monkeypatch.setattr(auto_profile.shutil, "which", lambda name: None)
    assert auto_profile.missing_prerequisite() == "runc is not installed"
