"""A conversion cannot take ``imgaccel serve`` down: each job converts in a child process held
to an address-space and a wall-clock limit; breaking one fails that job at once (no retry
loop, also across restarts) while the service keeps answering. And a service whose data_dir
cannot hold its job store says so in one line, or answers 503, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fault_proxy import FaultProxy
from tests.helpers import ROOT
from tests.registry import Registry
from tests.service import ServiceProcess, make_service, write_service_config
from tests.tar_forge import Header, Member, forge, regular
from tests.test_hostile_images import push_layers

CHILD = "imgaccel.service.isolated_job"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs for the data_dir needs root")


def children_of(pid: int) -> list[int]:
    """Conversion processes whose parent is ``pid`` (or any, with pid 0)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if CHILD.encode() in cmdline and (pid == 0 or ppid == pid):
            out.append(int(d.name))
    return out


def healthz_ms(service: ServiceProcess) -> float:
    t0 = time.monotonic()
    with urllib.request.urlopen(f"{service.url}/healthz", timeout=5) as r:
        assert r.status == 200
    return (time.monotonic() - t0) * 1000


def submit(service: ServiceProcess, ref: str) -> str:
    status, job = service.api("POST", "/api/v1/jobs", {"reference": ref})
    assert status == 202, job
    return str(job["id"])


@pytest.fixture
def slow_proxy(registry: Registry) -> Iterator[FaultProxy]:
    """Blob GETs wait 3 s each: conversions that are still running when a test acts."""

    def slow(method: str, path: str, n: int) -> str | None:
        return "slow" if method == "GET" and "/blobs/sha256:" in path else None

    proxy = FaultProxy(registry.host, slow).start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.mark.timeout(300)
def test_memory_limit_fails_the_job_once_and_the_service_keeps_answering(registry: Registry, tmp_path: Path) -> None:
    """The 200 MB PAX header, with the header limit raised so that only the memory limit stops it."""
    tar = forge([Member(Header(b"p", b"0", 3), b"abc", {b"comment": b"z" * (200 << 20)}), regular("b", b"1")])
    push_layers(registry, "poison/pax", tar)
    config = {
        "reconcile_interval": 0,
        "cache_repo": None,
        "limits": {"max_header_bytes": 1 << 30},
        "isolation": {"memory_limit": 300 << 20},
        "retry": {"attempts": 3, "base_delay": 0.1},
    }
    service = make_service(tmp_path / "svc", config).start()
    try:
        job_id = submit(service, f"{registry.host}/poison/pax:v1")
        slowest = 0.0
        deadline = time.monotonic() + 240
        while (job := next(j for j in service.jobs() if j["id"] == job_id))["state"] in ("queued", "running"):
            slowest = max(slowest, healthz_ms(service))
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
        assert job["state"] == "failed", job
        assert "address-space limit of 314572800 bytes (isolation.memory_limit)" in job["last_error"], job["last_error"]
        assert job["attempts"] == 1  # a limit is not retried
        assert slowest < 1000, f"/healthz took {slowest:.0f} ms during the conversion"
        assert "v1_accelerated" not in registry.tags("poison/pax")
        assert service.process and service.process.poll() is None
    finally:
        service.stop()


@pytest.mark.timeout(120)
def test_wall_clock_limit_kills_the_conversion(registry: Registry, slow_proxy: FaultProxy, tmp_path: Path) -> None:
    push_layers(registry, "poison/slow", forge([regular("a", b"1")]))
    config = {
        "registries": [{"endpoint": slow_proxy.host}],
        "reconcile_interval": 0,
        "cache_repo": None,
        "isolation": {"timeout": 1},
    }
    service = make_service(tmp_path / "svc", config).start()
    try:
        job_id = submit(service, f"{slow_proxy.host}/poison/slow:v1")
        job = service.wait_job(lambda j: j["id"] == job_id and j["state"] == "failed")
        assert "wall-clock limit of 1 s (isolation.timeout)" in job["last_error"]
        assert job["attempts"] == 1
        assert service.process is not None
        assert children_of(service.process.pid) == []  # killed, not left running
    finally:
        service.stop()


@pytest.mark.timeout(180)
def test_a_restart_does_not_loop_on_a_job_that_stops_the_service(
    registry: Registry, slow_proxy: FaultProxy, tmp_path: Path
) -> None:
    push_layers(registry, "poison/restart", forge([regular("a", b"1")]))
    config = {
        "registries": [{"endpoint": slow_proxy.host}],
        "reconcile_interval": 0,
        "cache_repo": None,
        "retry": {"attempts": 1},
    }
    service = make_service(tmp_path / "svc", config).start()
    try:
        job_id = submit(service, f"{slow_proxy.host}/poison/restart:v1")
        service.wait_job(lambda j: j["id"] == job_id and j["state"] == "running")
        assert service.process is not None
        deadline = time.monotonic() + 20
        while not (child := children_of(service.process.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child, "no conversion process was started"
        service.kill()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child[0]}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{child[0]}").exists(), "the conversion outlived the killed service"
        service.start()
        job = service.wait_job(lambda j: j["id"] == job_id and j["state"] == "failed", timeout=30)
        assert job["last_error"] == "the service stopped during each of its 1 attempts"
    finally:
        service.stop()


def serve_once(config_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imgaccel.cli.main", "serve", "--config", str(config_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_data_dir_that_is_not_a_directory_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    config = write_service_config(tmp_path, 1, {"data_dir": str(tmp_path / "file" / "data")})
    r = serve_once(config)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"error: data_dir {tmp_path / 'file' / 'data'}: cannot keep the job store there: Not a directory"
    ], r.stderr


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@needs_root
def test_read_only_data_dir_is_one_line(small_tmpfs: Path, tmp_path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    for data_dir in (small_tmpfs, small_tmpfs / "missing"):
        config = write_service_config(tmp_path, 1, {"data_dir": str(data_dir)})
        r = serve_once(config)
        assert r.returncode == 1
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: data_dir {data_dir}: cannot keep the job store"), (
            r.stderr
        )
        assert "Traceback" not in r.stderr


@needs_root
@pytest.mark.timeout(120)
def test_readyz_and_intake_answer_503_when_the_store_cannot_write(
    registry: Registry, small_tmpfs: Path, tmp_path: Path
) -> None:
    service = make_service(tmp_path / "svc", {"data_dir": str(small_tmpfs), "reconcile_interval": 0}).start()
    try:
        assert service.api("GET", "/readyz")[0] == 200
        with open(small_tmpfs / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError:
                pass
        status, body = service.api("GET", "/readyz")
        assert status == 503 and body["ready"] is False
        assert "job store cannot write" in body["error"], body
        event = {
            "events": [
                {
                    "action": "push",
                    "target": {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": "sha256:" + "ab" * 32,
                        "repository": "team/app",
                        "tag": "v1",
                    },
                    "request": {"host": registry.host},
                }
            ]
        }
        status, body = service.api("POST", "/events", event)
        assert status == 503 and "job store unavailable" in body["error"], body
        assert service.api("GET", "/healthz")[0] == 200
        (small_tmpfs / "filler").unlink()
        assert service.api("GET", "/readyz")[0] == 200  # ready again once there is room
    finally:
        service.stop()
